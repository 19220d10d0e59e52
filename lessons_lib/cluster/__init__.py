"""The cluster: launching with torchrun across "nodes", topology-aware placement of a
TP x PP x DP plan, and sharded checkpoint loading. Import the submodule you need."""
