"""Distribution of FluxModel: tensor and context parallelism, activation checkpointing,
compile and FSDP/HSDP, applied from outside the model by parallelize_flux."""
