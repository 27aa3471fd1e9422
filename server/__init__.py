"""The training server: FastAPI ingest (``app``), durable SQLite store (``store``), the
side-network learning core (``side``), the trainer thread (``trainer``) and personal-model
export (``personal``).

Import-light on purpose: nothing here imports torch or FastAPI; import the submodule you need.
"""
