"""fedmobillm: federated fine-tuning of language models across heterogeneous phones
by server-assisted side-tuning (the Fed MobiLLM design).

Parts, each importable as ``fedmobillm.<part>``:

- ``fedmobillm.export``: Hugging Face model -> bundle (.pte / .onnx + manifest)
- ``fedmobillm.device_runtime``: the device role (torch-free ONNX path), wire protocol
- ``fedmobillm.server``: FastAPI ingest, SQLite store, side-network trainer
- ``fedmobillm.android_bridge``: adb profiling / benchmarking / phone-in-the-loop
"""

__version__ = "0.1.0"
