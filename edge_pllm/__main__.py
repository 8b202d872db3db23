"""`python -m edge_pllm`: the same CLI as the `edge-pllm` command."""

from .cli import main

main()
