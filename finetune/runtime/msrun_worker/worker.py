"""What msrun starts on every worker: the `finetune` entrypoint, marked as a worker.

It lives in its own folder because msrun runs it as a script, which puts the script's folder
first on sys.path; next to the package's modules (model.py, metrics.py, ...) those would shadow
same-named top-level packages."""
import os
import sys

if __name__ == "__main__":
    sys.path.pop(0)
    os.environ["FINETUNE_WORKER"] = "1"
    # launch.worker_failure matches msrun's "Worker process PID exit with exception" to this line.
    print(f"finetune worker pid {os.getpid()} rank {os.environ.get('RANK_ID', '?')}", flush=True)
    from finetune.app import main

    main()
