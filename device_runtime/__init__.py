"""The device role: verify a bundle, run its forward graph over local data, quantize the
tapped pivot activations and upload them. Torch-free on the ONNX path.

Also home of the wire protocol (``protocol``) and its byte conversion (``serde``), which the
server and the exporter import from here.
"""
