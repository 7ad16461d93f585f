"""The demo's closing summary: what the model learned, next to chance, and where things are.

configs/demo.py names `demo_summary_hook` in `config.summary_hooks`, so the trainer adds
its text to the end-of-run summary. For a run of the demo (a `multimodal` model on
`shapes` with retrieval and VQA metrics) it prints

    image -> caption recall@1   0.xxx   chance 0.001 (1 in 1,000 validation captions)
    caption -> image recall@1   0.xxx   chance 0.001
    VQA accuracy                0.xxx   chance 0.255 (best answer from the question alone)

and where the checkpoints, TensorBoard logs and metrics.jsonl are. Runs without these
metrics get nothing added. (It lived in experiments/demo_summary.py, which only a
source checkout has; that name still works, with a deprecation warning.)
"""
import os
from typing import Any, Dict, Mapping, Optional

from mmjax.train import paths

RETRIEVAL = (("image -> caption recall@1", "eval/i2t_recall@1"),
             ("caption -> image recall@1", "eval/t2i_recall@1"))
VQA = ("VQA accuracy", "eval/vqa_accuracy")


def chance_levels(data_config) -> Dict[str, float]:
  """Chance recall@1 of retrieval and question-only VQA accuracy on the eval split."""
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  info = pipeline.dataset_info(data_config)
  chance = info.get("chance", {})
  out = {"retrieval": chance.get(f"retrieval_recall_at_1_{info['eval_split']}")}
  out["eval_size"] = info["splits"].get(info["eval_split"])
  out["vqa"] = chance.get("answer_question_only_overall")
  return out


def format_demo_summary(results: Mapping[str, Any], chance: Mapping[str, Optional[float]],
                        workdir: str) -> str:
  """The lines above, for the metrics present in `results`."""
  lines = ["", f"=== what the model learned ({chance.get('eval_size') or '?'} held-out "
               "scenes) ==="]
  for name, key in RETRIEVAL:
    if key in results and chance.get("retrieval"):
      lines.append(f"  {name:<28}{results[key]:>7.3f}   chance {chance['retrieval']:.3f} "
                   f"(1 in {round(1 / chance['retrieval']):,} captions)")
  name, key = VQA
  if key in results and chance.get("vqa") is not None:
    lines.append(f"  {name:<28}{results[key]:>7.3f}   chance {chance['vqa']:.3f} "
                 "(best answer from the question alone)")
  lines += [f"  checkpoints   {os.path.join(workdir, 'checkpoints')}",
            f"  TensorBoard   tensorboard --logdir {os.path.join(workdir, 'tensorboard')}",
            f"  metrics       {os.path.join(workdir, 'metrics.jsonl')}"]
  return "\n".join(lines)


def demo_summary_hook(results: Mapping[str, Any], config, workdir: str) -> str:
  """The text above, or "" for a run without the demo's metrics (e.g. a VQA-only run)."""
  keys = [key for _, key in RETRIEVAL] + [VQA[1]]
  if not any(key in results for key in keys) or config.get("data") is None:
    return ""
  return format_demo_summary(results, chance_levels(config.data), paths.absolute(workdir))
