"""Trains a jfcnn model.

    python train.py --config configs/unet.py --workdir runs/unet
    python train.py --config configs/unet.py --workdir runs/unet --config.num_train_steps=200

Rerunning the same command resumes from the latest checkpoint in --workdir.
The logic lives in `jfcnn.train.train_and_evaluate`; this file only parses flags.
"""

from jfcnn import cli

# Before anything imports the training stack: one line, not an ImportError.
cli.exit_unless_installed("train", "train.py")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jfcnn import distributed  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (see configs/).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_flags()  # --coordinator_address, --num_processes, --process_id, ...


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    with cli.exit_on_user_error(), distributed.exit_on_peer_failure():
        # Imported once the flags parsed: a mistyped key or value is reported at
        # once, not after the seconds TensorFlow and JAX take to import.
        from jfcnn import train

        joined = distributed.initialize_from_flags()
        if not joined and FLAGS.config.task == "semantic":
            # Alone on a CPU host, the U-Net trains on one device per core, the batch
            # sharded over them. Not Mask R-CNN: sharded over two CPU devices, 40 steps
            # of the tests' tiny model took over 240 s instead of 45.
            distributed.split_cpu_into_devices(FLAGS.config.batch_size)
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli.parse_flags_or_exit(argv, FLAGS))
