"""Render the synthetic shapes dataset: ``python scripts/make_shapes.py data/shapes32-v2 --resolution 32``."""

from datamodules.shapes import main

if __name__ == "__main__":
    main()
