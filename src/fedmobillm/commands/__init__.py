"""One module per CLI workflow. Each defines ``NAME``, ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``. Heavy imports (torch, transformers, ...) stay inside ``run``
so that ``fedmobillm --help`` is instant and the device role never imports torch."""

# Order shown by `fedmobillm --help`: the order a newcomer meets them.
COMMAND_MODULES = [
    "models",
    "data",
    "export",
    "inspect",
    "device",
    "serve",
    "train",
    "server",
    "android",
    "demo",
]
