"""flux: FLUX.1 pre-training on torchtitan's trainer.

`flux.model` is the plain-PyTorch model; `flux.train` the trainer (it registers the "flux"
TrainSpec, flux.train_spec, with torchtitan)."""
