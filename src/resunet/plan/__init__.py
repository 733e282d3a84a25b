"""Self-configuration: dataset fingerprint -> rules + timed steps on this machine -> a training plan.

`plan_dataset(dataset, minutes)` returns a `Plan` whose ``config`` `resunet.train.fit` trains;
`fingerprint_dataset` measures a dataset; the rules (pure functions) live in `resunet.plan.rules`.
"""

from resunet.plan.fingerprint import DatasetFingerprint, fingerprint_dataset
from resunet.plan.planner import DEFAULT_MINUTES, Plan, plan_dataset

__all__ = ["DEFAULT_MINUTES", "DatasetFingerprint", "Plan", "fingerprint_dataset", "plan_dataset"]
