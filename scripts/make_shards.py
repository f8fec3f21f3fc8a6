"""Convert images + captions into tar shards. See ``datamodules/convert.py`` for the formats."""

from datamodules.convert import main

if __name__ == "__main__":
    main()
