"""Names that one module writes and another reads: run tags, artifact paths, metrics.

MLflow keys are plain strings; spelled once here, a typo is a NameError rather than a
search that silently finds nothing.
"""

# Run tags.
TAG_STAGE = "pairnet.stage"  # pretrain | stage1 | stage2 | stage3 | tune | stack | pipeline | data | predict
TAG_MODEL = "pairnet.model"  # zoo variant
TAG_SEED = "pairnet.seed"
TAG_PRESET = "pairnet.preset"
TAG_DATA_DIGEST = "pairnet.data_digest"
TAG_GIT_COMMIT = "pairnet.git_commit"
TAG_SOURCE_COMMIT = "mlflow.source.git.commit"  # the same commit, where MLflow's UI shows it
TAG_REGISTERED_NAME = "pairnet.registered_name"
TAG_MODEL_VERSION = "pairnet.model_version"  # the version a run registered
TAG_CHAMPION_DECISION = "pairnet.champion_decision"
TAG_INIT_FROM = "pairnet.init_from"  # models:/ URI a fine-tuned run started from
TAG_INIT_FROM_RUN = "pairnet.init_from_run"
TAG_RESUMED_FROM = "pairnet.resumed_from"
TAG_STEP_KEY = "pairnet.step_key"  # pipeline: hash of what a step's result depends on
TAG_OUTPUT_DIGEST = "pairnet.output_digest"
TAG_NAMESPACE = "pairnet.namespace"  # experiment tag: the prefix of the registered names its runs make
TAG_OUTSIDE_DATA = "pairnet.outside_data"  # pipeline: what the towers learned from beside the folder (none: nothing)
TAG_SHIPS = "pairnet.ships"  # pipeline: the model whose predictions it wrote
TAG_BEST_MODEL = "pairnet.best_model"  # tune: the registered best trial
TAG_SWEPT = "pairnet.swept"  # why a dead process's run was ended FAILED
TAG_METRICS_LOST = "pairnet.metrics_lost"  # metric values that never reached the server (the run ended FAILED)
TAG_NOTE = "mlflow.note.content"  # MLflow's run description
TAG_PARENT = "mlflow.parentRunId"

# Model-version tags.
TAG_FORMAT = "pairnet.format"  # safetensors-v1: loadable without pickle
TAG_KIND = "pairnet.kind"  # pair | stack

# Artifacts.
CHECKPOINT_ARTIFACT = "checkpoint/last.pt"  # the newest epoch of a training run, for resume

# Metrics read across modules.
VAL_ACC = "val_acc"
TEST_PUBLIC_ACC = "test_public_acc"
CV_OOF_ACC = "cv_oof_acc"
