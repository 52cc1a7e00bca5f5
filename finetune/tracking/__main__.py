"""`python -m finetune.tracking sync <run dir>/mlflow_pending.json`: send what a run could not log."""
import sys

from finetune.tracking.sync import main

sys.exit(main())
