"""`python -m gpuattest` runs the command line."""

from gpuattest.cli import main

main()
