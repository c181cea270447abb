"""Standard benchmarks through lm-eval (optional extra `eval`): our loaded model, at its published precisions,
is handed to lm-eval's `HFLM`, which accepts an already-built transformers model. Everything runs offline:
tasks may be lm-eval's own (when their datasets are cached locally) or YAML files in `include_path`, e.g. a
local JSONL task:

    task: my_ppl
    dataset_path: json
    dataset_kwargs: {data_files: {test: /abs/path/ppl.jsonl}}
    test_split: test
    output_type: loglikelihood_rolling
    doc_to_text: ""
    doc_to_target: "{{text}}"
    metric_list: [{metric: word_perplexity}, {metric: bits_per_byte}]

With a runtime policy every forward lm-eval makes is one engine step (`engine.run`: the controller sees
its routing and decides when due), as in the decode loop and the server; a generation task's `generate` call is
one step however many tokens it makes.
"""
from __future__ import annotations

from dynaexq.errors import UserError


def as_lm(engine, batch_size: int = 8, max_length: int | None = None):
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise UserError("lm-eval is not installed; pip install 'dynaexq[eval]'") from None
    if engine.tokenizer is None:
        raise UserError("this model has no tokenizer files; lm-eval needs one")
    max_length = max_length or getattr(engine.model.config, "max_position_embeddings", 2048)

    class EngineLM(HFLM):  # each forward (and each generate call) is one engine step
        def _model_call(self, *args, **kwargs):
            return engine.run(call=lambda: super(EngineLM, self)._model_call(*args, **kwargs))

        def _model_generate(self, *args, **kwargs):
            return engine.run(call=lambda: super(EngineLM, self)._model_generate(*args, **kwargs))

    return EngineLM(pretrained=engine.model, tokenizer=engine.tokenizer, batch_size=batch_size, max_length=max_length)


def run(engine, tasks: list[str], include_path=None, limit=None, batch_size: int = 8, num_fewshot=None) -> dict:
    """lm-eval's simple_evaluate on the engine's model -> its results dict."""
    lm = as_lm(engine, batch_size)
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include_path] if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval task(s) {unknown} are unknown; give a task YAML directory with --include-path or "
                        "one of lm-eval's task names (`lm_eval ls tasks`)")
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                   num_fewshot=num_fewshot, log_samples=False)
