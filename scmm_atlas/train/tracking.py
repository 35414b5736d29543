"""MLflow from the driver: the run, its params and artifacts, the logged model, the registry.

The default tracking store is a local SQLite file (``runs/mlflow.db``); ``MLFLOW_TRACKING_URI``
wins when set. Params are the full resolved config, flattened (``model.latent_dim``, ...).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Param

from ..model import MMVAEConfig
from ..model.saved import write_meta
from .pyfunc import META, WEIGHTS, ScmmEmbedder

DEFAULT_TRACKING = "sqlite:///runs/mlflow.db"
CHAMPION = "champion"
STORE_CELLS_TAG = "store_n_obs"  # the store's cell count when the version was trained


def tracking_uri(explicit: str | None = None) -> str:
    """The tracking URI to use; a SQLite file is made absolute (Ray workers run in other folders)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).expanduser().resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
    return uri


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database (MLflow's default is ./mlruns in the current
    directory); a tracking server keeps its own default."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


def start_run(client: MlflowClient, experiment: str, run_name: str, params: Mapping[str, str],
              tags: Mapping[str, str]) -> str:
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(
        experiment, artifact_location=artifact_root(client.tracking_uri))
    run = client.create_run(exp_id, run_name=run_name, tags=dict(tags))
    for chunk in range(0, len(params), 90):
        items = list(params.items())[chunk : chunk + 90]
        client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in items])
    return run.info.run_id


def log_artifacts(client: MlflowClient, run_id: str, *, config: Mapping[str, Any],
                  features: Mapping[str, list[str]], history: list[dict[str, float]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "config.yaml").write_text(yaml.safe_dump(dict(config), sort_keys=False))
        for mod, names in features.items():
            (root / f"features_{mod}.txt").write_text("\n".join(names) + "\n")
        if history:
            _loss_curve(history, root / "loss_curve.png")
        client.log_artifacts(run_id, str(root))


def _loss_curve(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    if any("val_loss" in h for h in history):
        ax.plot([h["epoch"] for h in history if "val_loss" in h], [h["val_loss"] for h in history if "val_loss" in h],
                label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per cell")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_model(run_id: str, *, weights: Path, model_config: MMVAEConfig, features: Mapping[str, list[str]],
              batches: list[str], model_name: str, val_loss: float | None, store_n_obs: int | None = None,
              force_champion: bool = False) -> tuple[str, bool]:
    """Log the pyfunc model in ``run_id``, register a new version of ``model_name`` and move the
    ``champion`` alias to it only if its validation loss beats the current champion's (or
    ``force_champion``). The version is tagged with the store's cell count it was trained on
    (``store_n_obs``), which reprocessing compares with the store's. Returns (version, became champion)."""
    with tempfile.TemporaryDirectory() as d:
        meta = write_meta(Path(d), model_config, features, batches)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=ScmmEmbedder(), pip_requirements=_requirements(),
                                           artifacts={META: str(meta), WEIGHTS: str(weights)})
    client = MlflowClient()
    version = mlflow.register_model(info.model_uri, model_name).version
    if val_loss is not None:
        client.set_model_version_tag(model_name, version, "val_loss", repr(val_loss))
    if store_n_obs is not None:
        client.set_model_version_tag(model_name, version, STORE_CELLS_TAG, str(store_n_obs))
    champion = _champion_val(client, model_name)
    better = force_champion or champion is None or (val_loss is not None and val_loss < champion)
    if better:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    return str(version), better


def _requirements() -> list[str]:
    """What loading the model imports (MLflow adds itself), pinned to this environment's versions. Given,
    because inferring them loads the model in a subprocess: seconds of CPU at every registration."""
    return [f"{dist}=={version(dist).split('+')[0]}" for dist in ("scmm-atlas", "torch", "numpy")]


def _champion_val(client: MlflowClient, model_name: str) -> float | None:
    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
    value = current.tags.get("val_loss")
    return float(value) if value is not None else float("inf")
