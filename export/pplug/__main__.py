"""`python -m export.pplug …` is the `edge-pllm` command (`edge-pllm train-plug` as
`python -m export.pplug train-plug`), for launchers that start a module rather than a
program: `torchrun -m export.pplug train-plug TASK …`. (`python -m edge_pllm.cli` would
load the CLI twice, as __main__ and as the module its commands register with.)"""

from edge_pllm.cli import main

if __name__ == "__main__":
    main()
