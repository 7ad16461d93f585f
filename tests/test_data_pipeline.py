"""Input pipeline: batch contract, determinism, sharding, exact resume, eval exactness."""
import os
import subprocess
import sys
import textwrap

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmjax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  config = pipeline.default_config("digits", data_dir=str(tmp_path_factory.mktemp("data")))
  pipeline.dataset_info(config)  # prepares once for the module
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_batches_follow_the_batch_contract(digits):
  batch = next(pipeline.create_train_iterator(digits, global_batch_size=8, seed=0))
  expected = {"image": ((8, 8, 8, 3), np.float32), "text": ((8, 24), np.int32),
              "question": ((8, 16), np.int32), "answer": ((8,), np.int32),
              "label": ((8,), np.int32), "question_type": ((8,), np.int32),
              "index": ((8,), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert np.all((batch["text"] > 0).sum(1) > 0)  # captions are not empty
  assert np.all(batch["text"][:, -1] == 0)  # and padded with 0
  assert np.all(np.abs(batch["image"]) <= 1.0)


@pytest.mark.parametrize("max_answer_len", [0, 4])
def test_batch_spec_declares_what_the_iterators_give(digits, max_answer_len):
  """The shapes `mmjax.aot` compiles for, read without data, are the real batches' (the
  answers' tokens of generative VQA included)."""
  config = digits.copy_and_resolve_references()
  config.max_answer_len = max_answer_len
  for train, iterator in ((True, pipeline.create_train_iterator(config, global_batch_size=8, seed=0)),
                          (False, pipeline.create_eval_iterator(config, global_batch_size=8))):
    batch = next(iter(iterator))
    want = {k: ((8,) + shape, dtype)
            for k, (shape, dtype) in pipeline.batch_spec(config, train=train).items()}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == want
    assert ("answer_text" in want) == bool(max_answer_len)


def test_train_order_is_a_function_of_the_seed(digits):
  a = take(pipeline.create_train_iterator(digits, global_batch_size=8, seed=3), 3)
  b = take(pipeline.create_train_iterator(digits, global_batch_size=8, seed=3), 3)
  c = take(pipeline.create_train_iterator(digits, global_batch_size=8, seed=4), 3)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["index"], c[0]["index"])


def test_global_batch_must_split_over_processes(digits):
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    pipeline.create_train_iterator(digits, global_batch_size=7, seed=0, process_count=2,
                                   process_index=0)


def test_unknown_config_field_is_an_error(digits):
  config = digits.copy_and_resolve_references()
  with config.unlocked():
    config.max_txt_len = 3
  with pytest.raises(ValueError, match="Unknown config.data keys.*max_txt_len"):
    pipeline.dataset_info(config)


def test_two_processes_see_disjoint_shards_covering_the_split(digits):
  num_train = pipeline.dataset_info(digits)["splits"]["train"]  # 1500 = 2 * 750
  seen = []
  for process in range(2):
    it = pipeline.create_train_iterator(digits, global_batch_size=20, seed=0,
                                        process_index=process, process_count=2)
    epoch = np.concatenate([b["index"] for b in take(it, 750 // 10)])
    assert len(set(epoch)) == 750  # one epoch of this shard: no repeats
    seen.append(set(epoch))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(num_train))


def test_eval_iterator_sees_every_example_once_with_padding(digits):
  num_test = pipeline.dataset_info(digits)["splits"]["test"]  # 297
  indices, num_batches = [], []
  for process in range(2):
    batches = list(pipeline.create_eval_iterator(digits, global_batch_size=64,
                                                 process_index=process, process_count=2))
    num_batches.append(len(batches))
    for b in batches:
      assert b["valid"].dtype == np.bool_ and b["image"].shape[0] == 32
      assert np.all(b["index"][~b["valid"]] == -1)
      assert np.all(b["image"][~b["valid"]] == 0)
      indices.extend(b["index"][b["valid"]])
  assert num_batches[0] == num_batches[1] == 5  # 149 rows per process -> 5 x 32
  assert sorted(indices) == list(range(num_test))


def test_eval_iterator_is_deterministic_and_restartable(digits):
  ev = pipeline.create_eval_iterator(digits, global_batch_size=100)
  assert_batches_equal(list(ev), list(ev))


def test_augmentation_depends_only_on_seed_example_and_epoch(digits):
  """Same (seed, index, epoch) -> same pixels, whatever the batch size or process split."""
  config = digits.copy_and_resolve_references()
  config.preprocess = "decode|random_crop(8, pad=2)|flip_lr|keep('image')"
  def examples(**kw):
    out = {}
    for b in take(pipeline.create_train_iterator(config, seed=1, **kw), 10):
      out.update(zip(b["index"].tolist(), b["image"]))
    return out
  big, small = examples(global_batch_size=20), examples(global_batch_size=10)
  other = examples(global_batch_size=20, process_index=1, process_count=2)
  for index in set(big) & set(small):
    np.testing.assert_array_equal(big[index], small[index])
  assert set(big) & set(small)
  # Different epochs of the same example draw different augmentations.
  it = pipeline.create_train_iterator(config, global_batch_size=20, seed=1,
                                      process_index=1, process_count=2)
  epochs = []
  for _ in range(2):  # 75 batches of 10 = one epoch of the 750-example shard
    epochs.append({i: x for b in take(it, 75) for i, x in zip(b["index"].tolist(), b["image"])})
  assert set(epochs[0]) == set(epochs[1])
  assert any(not np.array_equal(epochs[0][i], epochs[1][i]) for i in epochs[0])
  for index in set(other) & set(big):
    np.testing.assert_array_equal(other[index], big[index])


RESTORE_SCRIPT = textwrap.dedent("""
    import sys
    import grain, numpy as np, orbax.checkpoint as ocp
    from mmjax.data import pipeline
    config = pipeline.default_config("digits", data_dir=sys.argv[1])
    config.preprocess = "decode|random_crop(8, pad=2)|flip_lr|tokenize('caption', 'text', 8)|keep('image', 'text', 'label')"
    it = pipeline.create_train_iterator(config, global_batch_size=8, seed=5)
    mngr = ocp.CheckpointManager(sys.argv[2])
    mngr.restore(mngr.latest_step(),
                 args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))
    batches = [next(it) for _ in range(3)]
    np.savez(sys.argv[3], **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
""")


def test_restored_iterator_in_a_new_process_continues_exactly(digits, tmp_path):
  config = digits.copy_and_resolve_references()
  config.preprocess = "decode|random_crop(8, pad=2)|flip_lr|tokenize('caption', 'text', 8)|keep('image', 'text', 'label')"
  it = pipeline.create_train_iterator(config, global_batch_size=8, seed=5)
  take(it, 4)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = take(it, 3)
  out = tmp_path / "restored.npz"
  subprocess.run([sys.executable, "-c", RESTORE_SCRIPT, digits.data_dir,
                  str(tmp_path / "ckpt"), str(out)], check=True, cwd=ROOT,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
  restored = np.load(out)
  got = [{k: restored[f"{i}/{k}"] for k in expected[0]} for i in range(3)]
  assert_batches_equal(got, expected)


def test_worker_processes_give_the_same_batches_and_restore_exactly(digits):
  config = digits.copy_and_resolve_references()
  config.preprocess = "decode|random_crop(8, pad=2)|keep('image', 'label')"
  expected = take(pipeline.create_train_iterator(config, global_batch_size=8, seed=2), 6)
  config.num_workers = 1
  it = pipeline.create_train_iterator(config, global_batch_size=8, seed=2)
  first = take(it, 3)
  state = it.get_state()
  assert_batches_equal(first + take(it, 3), expected)
  restored = pipeline.create_train_iterator(config, global_batch_size=8, seed=2)
  restored.set_state(state)
  assert_batches_equal(take(restored, 3), expected[3:])
