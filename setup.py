"""Package metadata for memjax (and, beside it, the `kernels` package)."""

from setuptools import find_packages, setup

setup(
    name="memjax",
    version="0.1.0",
    description="JAX research code for recurrent and state-space memory architectures.",
    python_requires=">=3.12",  # why: docs/design.md, Tests and versions (jax 0.10 deadlocked).
    packages=find_packages(include=["memjax", "memjax.*", "kernels", "kernels.*"]),
    # Data files inside packages: the digit images of memjax.tasks.digits (UCI, CC BY 4.0).
    package_data={"memjax.tasks": ["assets/*.npz"]},
    install_requires=[
        "jax>=0.12",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        # Run directories as paths or URIs (memjax.paths; Orbax depends on it too).
        "etils[epath]>=1.12",
        "grain>=0.2.18",
        "ml-collections>=1.1",
        "numpy>=2.0",
        "absl-py>=2.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.9",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        # gs:// workdirs: epath's file system for them (gcsfs), and the client tensorboardX
        # writes TensorBoard there with (scripts/launch_pod.py installs it for a gs:// workdir).
        "gcs": ["etils[epath-gcs]>=1.12", "google-cloud-storage>=2.0"],
    },
)
