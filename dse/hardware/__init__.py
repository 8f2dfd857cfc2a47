"""The machine: devices, NVML, energy sources, the environment report and thread counts."""
