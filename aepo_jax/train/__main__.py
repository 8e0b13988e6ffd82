"""`python -m aepo_jax.train --flagfile=configs/X.flags [--flag=value ...]`.

Without --flagfile it runs the built-in CPU demo (configs/cpu_demo.flags), with any other flags given
overriding it.
"""

import os
import sys
from types import SimpleNamespace

from absl import app, flags, logging

from aepo_jax.train import flags as train_flags

CPU_DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cpu_demo.flags")


def describe_mesh() -> str:
    """The mesh the flags ask for, and whether this machine's devices can form it."""
    import jax
    from aepo_jax.models import sharding
    f = train_flags
    sizes = (f.MESH_DATA.value, f.MESH_FSDP.value, f.MESH_TP.value)
    devices = f"{jax.device_count()} {jax.devices()[0].platform} device(s) in {jax.process_count()} process(es)"
    try:
        mesh = sharding.make_mesh(*sizes)
    except ValueError as e:
        return f"mesh data x fsdp x tp = {sizes}: cannot be built on this machine's {devices} ({e})"
    return f"mesh {dict(mesh.shape)} over {devices}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
    if not flags.FLAGS["verbosity"].present:  # keep the console for the progress lines
        logging.set_verbosity(logging.WARNING)
    values = train_flags.resolved()
    if train_flags.DRY_RUN.value:
        width = max(map(len, values))
        for name, value in values.items():
            print(f"{name:<{width}}  {value!r}")
        print(describe_mesh())
        return
    from aepo_jax.train.trainer import Trainer
    Trainer(SimpleNamespace(**values)).run()


def run():
    argv = sys.argv
    if not any(a.startswith(("--flagfile", "-flagfile")) for a in argv[1:]):
        if not os.path.exists(CPU_DEMO):
            sys.exit(f"no --flagfile given and the default {os.path.abspath(CPU_DEMO)} is missing "
                     "(run from a source checkout, or pass --flagfile)")
        argv = argv[:1] + [f"--flagfile={os.path.abspath(CPU_DEMO)}"] + argv[1:]  # later flags override
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
