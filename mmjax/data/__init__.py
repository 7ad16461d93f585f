"""Data: TFDS builders that prepare offline, grain pipelines, tokenizers.

Batch contract (what pipelines yield and models read; every array has the batch as its
leading axis; numpy on the host, global jax.Arrays inside the train step):

  image     float32 [B, H, W, 3]      normalised pixels
  video     float32 [B, T, H, W, 3]
  audio     float32 [B, num_samples]  mono waveform (models compute the spectrogram)
  sensor    float32 [B, T, C]         time series
  text      int32   [B, L]            caption token ids, padded with the tokenizer's pad id
  question  int32   [B, L]            question token ids, likewise
  answer    int32   [B]               index into the answer vocabulary
  label     int32   [B]               class index
  valid     bool    [B]               eval batches only: False on padding rows

Extra keys some pipelines add (models may ignore them):

  index          int32   [B]          position of the example in its split (-1 on
                                      padding rows): joins eval outputs to records
  question_type  int32   [B]          kind of question (e.g. which modalities it needs),
                                      for accuracy per type; see dataset_info()
  spectrogram    float32 [B, T, F]    log-magnitude STFT, when the `spectrogram` op runs
  prefix         int32   [B, P]       generative VLM: prompt ids (0 = padding), full attention
  suffix         int32   [B, S]       generative VLM: target ids ending with EOS, causal
  task           int32   [B]          generative VLM: index into preprocess.VLM_TASKS
                                      (caption / vqa), which metric scores the row
  prompt_caption, prompt_vqa  int32 [B, P]  generative VLM: each task's prompt, so that
                                      evaluation generates every task for every example

  text_mask, question_mask  bool [B, L]  True on real tokens; written when the tokenizer's
                                      pad id is also a real token (CLIP BPE)

Token id 0 is padding for the SentencePiece and byte tokenizers (models mask `ids != 0`);
where the pad id is a real token (CLIP's BPE, whose id 0 is "!") the `<key>_mask` arrays
mark padding instead, and models use them when present.

Modules: pipeline.py (the grain iterators and config.data), dataset.py (what a dataset
provides, record checks), preprocess.py (ops named in the config), tokenizer.py,
builders/ (shapes, digits, public TFDS datasets).
"""
