from setuptools import find_packages, setup

setup(
    name="bdiff_pyro",
    version="0.1.0",
    description="Discrete (Bernoulli) diffusion models as Pyro programs, trained on the analytic bound",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["bdiff_pyro", "bdiff_pyro.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "pyro-ppl>=1.8",
        "numpy",
        "PyYAML",
        "tqdm",
        "matplotlib<3.11",
        "xarray<=2025.12.0",
        "arviz-base==0.8.2",
        "arviz-stats==0.8.0",
        "arviz-plots==0.8.0",
        "h5py",
        "h5netcdf",
        "scikit-learn",
    ],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["bdiff = bdiff_pyro.cli:main"]},
)
