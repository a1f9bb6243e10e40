"""The tiny test run as a config file, for tests that start `python -m s4eca_jax.train`
in several processes: "steps=6,data=-1,dcn=1,fsdp=1,stop=0,eval_every=-1" sets
total_steps, the mesh (data within a process times dcn across processes, as multi-slice
meshes are written), stop_after_steps and eval_every; the data set comes as --config.dataset and
--config.data_dir overrides."""

from s4eca_jax import presets
from tests import run_fixtures


def get_config(arg=None):
  arg = presets.parse_arg(arg, steps=6, data=-1, dcn=1, fsdp=1, stop=0, eval_every=-1)
  data_axis = ("data", arg.data) if arg.dcn == 1 else ("data", arg.data, arg.dcn)
  dataset = {"name": "", "tfds_data_dir": ""}  # set by the command line
  return run_fixtures.tiny_config(
      dataset, total_steps=arg.steps, mesh=(data_axis, ("fsdp", arg.fsdp)),
      stop_after_steps=arg.stop, eval_every=arg.eval_every)
