"""genforge.triton_kernels: Triton kernels, each with its launcher and a plain PyTorch reference.

- ``masked_conv``: masked conv2d over the kept taps only, bias and tanh·sigmoid gating fused.
- ``pixelcnn_decode``: fused cached decoding of a PixelCNN, one persistent launch per batch tile.

Nothing runs at import; without triton installed the modules import and their launchers raise.
"""
