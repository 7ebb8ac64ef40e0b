"""reconray: industrial visual anomaly detection (RLR, SGFR, PatchCore) that runs offline and scales on Ray.

`reconray.methods` holds the pure torch / numpy / faiss models, `reconray.pipelines` everything that touches Ray,
files or users (the `reconray` command line is `reconray.pipelines.cli`).
"""

__version__ = "0.2.0"
