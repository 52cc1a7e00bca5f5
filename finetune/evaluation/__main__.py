"""`python -m finetune.evaluation squad DATASET.json PREDICTIONS.json`: SQuAD scores of a prediction file."""
import sys

from finetune.evaluation.cli import main

sys.exit(main())
