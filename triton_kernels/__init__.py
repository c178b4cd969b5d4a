"""genforge.triton_kernels: Triton kernels, each with its launcher and a plain PyTorch reference.

- ``masked_conv``: masked conv2d over the kept taps only, bias and tanh·sigmoid gating fused.
- ``pixelcnn_decode``, ``gated_decode``: fused cached decoding of a PixelCNN / gated PixelCNN, one
  launch per batch, one program per tile of 16 images.
- ``decoders``: the table of fused decoders (model, supported likelihoods, pack, decode) the backend reads.

Nothing runs at import; without triton installed the modules import and their launchers raise.
"""
