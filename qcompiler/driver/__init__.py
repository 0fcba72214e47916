"""The driver: a run from a model and a scheme to the written artefact.

    config.py    QuantizeConfig: what a user asks of a run
    plan.py      the run's plan: target, pipeline (the default pipeline as a table), scheme as stored; --dry-run
    hf.py        Hugging Face checkpoints, block by block (the run as explicit steps over one state object)
    onnx.py      ONNX models: imported as one graph, the same passes, written back as ONNX
    fallback.py  mixed precision: the fewest float layers that meet a perplexity budget
    probe.py     per-layer output error of a block before/after the pipeline
"""

from qcompiler.driver.config import QuantizeConfig
from qcompiler.driver.hf import load_tokenizer, quantize
from qcompiler.driver.plan import ALGORITHMS, RunPlan, default_pipeline, plan_run

__all__ = ["ALGORITHMS", "QuantizeConfig", "RunPlan", "default_pipeline", "load_tokenizer", "plan_run", "quantize"]
