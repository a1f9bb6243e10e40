"""TFDS builders, one package per dataset. Importing this package registers them:

    import tfds_builders  # noqa: F401  (registers rrsis_d, refsegrs, synthetic_rrsis)
    tfds.data_source("rrsis_d", split="val", data_dir=...)

Build them with `python -m s4eca_jax.prepare {rrsis_d,refsegrs,synthetic_rrsis} ...`.
"""

from tfds_builders.refsegrs import Builder as RefsegrsBuilder
from tfds_builders.rrsis_d import Builder as RrsisdBuilder
from tfds_builders.synthetic_rrsis import Builder as SyntheticRrsisBuilder
from tfds_builders.synthetic_rrsis import synthetic_config

BUILDERS = {
    "rrsis_d": RrsisdBuilder,
    "refsegrs": RefsegrsBuilder,
    "synthetic_rrsis": SyntheticRrsisBuilder,
}
