"""``python -m iddc``: lists the tools, each run as ``python -m iddc.<tool>`` or its script."""
import sys

from .cli import SCRIPTS

#: what each tool of `SCRIPTS` does
TOOLS = {"iddc.train": "train and evaluate a model (by default a complete offline job)",
         "iddc.evaluate": "score a saved run's checkpoint on its val split",
         "iddc.predict": "segment image files or folders with a saved run",
         "iddc.data.layout": "check a data set's layout (and decode its files) before training"}


def main(argv) -> int:
    if argv not in ([], ["--help"], ["-h"]):
        print(f"python -m iddc: error: it takes no arguments (got {' '.join(argv)}); run one "
              "of its tools, listed by python -m iddc", file=sys.stderr)
        return 2
    print("iddc's tools (each takes --help):")
    for module in SCRIPTS.values():
        print(f"  python -m {module:17s} {TOOLS[module]}")
    print("or by their console scripts: " + ", ".join(SCRIPTS))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
