"""`python -m kdistill` (also what `accelerate launch -m kdistill run ...` starts on each process)."""
from kdistill.cli import main

main()
