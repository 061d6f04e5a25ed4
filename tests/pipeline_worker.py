"""One process of a 2-process pipeline run, started by ``torch.distributed.run``:

``pipeline_worker.py catch RESULT_DIR OUTPUT_DIR BASE DATA [scoring-fails-on-process-1]``
    ``Pipeline.run`` that catches the run's error and writes it to ``RESULT_DIR/rank-R.json``,
    as a script driving the pipeline under a launcher that does not stop the other processes
    when one fails would see it; optionally with the selection's scoring failing on process 1
    alone.
``pipeline_worker.py fsdp-on-cpu WMSS_TRAIN_ARGS...``
    ``wmss train WMSS_TRAIN_ARGS`` (with ``--fsdp``) on CPUs: accelerate runs FSDP on GPUs only
    (and ``wmss train`` refuses ``--fsdp`` elsewhere, ``pipeline.fsdp_runs_here``);
    ``distributed_trainer_worker.enable_fsdp_on_cpu`` (its docstring says how and why) makes
    accelerate finish its GPU branch on CPUs, and the refusal is lifted for this process.
``pipeline_worker.py deepspeed-on-cpu WMSS_TRAIN_ARGS...``
    ``wmss train WMSS_TRAIN_ARGS`` (with ``--deepspeed``) on CPUs. accelerate prepares DeepSpeed
    on GPU machines only; ``distributed_trainer_worker.enable_deepspeed_on_cpu`` (its docstring
    says how and why) lets the same code run on DeepSpeed's CPU accelerator over gloo.
"""

import json
import os
import sys

import torch


def catch(result_dir: str, output_dir: str, base: str, data: str, failing: str = "") -> None:
    from wmss.recipe.pipeline import Pipeline, PipelineConfig

    if failing == "scoring-fails-on-process-1":  # an error one process alone meets
        from wmss.recipe import selection

        score_dataset = selection.score_dataset

        def score_or_fail(*args, **kwargs):
            if os.environ["RANK"] == "1":
                raise ValueError("simulated scoring failure")
            return score_dataset(*args, **kwargs)

        selection.score_dataset = score_or_fail

    settings = PipelineConfig(output_dir=output_dir, data=data, base_model=base, rounds=1,
                              batch_size=2, max_length=64, use_cpu=True)
    try:
        Pipeline(settings, verbose=False).run()
        outcome = {"error": None}
    except Exception as error:  # noqa: BLE001 - what each process sees is the result
        outcome = {"error": type(error).__name__, "message": str(error)}
    rank = int(os.environ["RANK"])
    with open(os.path.join(result_dir, f"rank-{rank}.json"), "w") as handle:
        json.dump(outcome, handle)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def deepspeed_on_cpu(*arguments: str) -> int:
    from distributed_trainer_worker import enable_deepspeed_on_cpu

    from wmss import commands

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.distributed.init_process_group("gloo")
    enable_deepspeed_on_cpu()
    return _train(commands, arguments)


def _train(commands, arguments) -> int:
    """``wmss train ARGUMENTS`` as the ``wmss`` executable runs it (its end included)."""
    code = commands.main(["train", *arguments])
    commands.exit_launched_process(code)
    return code


def fsdp_on_cpu(*arguments: str) -> int:
    from distributed_trainer_worker import enable_fsdp_on_cpu

    from wmss import commands
    from wmss.recipe import pipeline

    enable_fsdp_on_cpu()
    pipeline.fsdp_runs_here = lambda use_cpu: True
    return _train(commands, arguments)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "catch":
        catch(*rest)
    elif mode == "deepspeed-on-cpu":
        sys.exit(deepspeed_on_cpu(*rest))
    elif mode == "fsdp-on-cpu":
        sys.exit(fsdp_on_cpu(*rest))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
