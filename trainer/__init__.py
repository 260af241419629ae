"""Stage 2: train students (and teachers) on replayed views joined with cached teacher logits.

Read in this order: ``losses`` (Eq. 1 and the top-k teacher distribution), ``data`` (shard stream -> view ->
cache join), ``engine`` (the one training loop: AdamW, schedule, AMP, DDP, checkpoints), ``train`` (student runs:
config, checks, teacher-to-token mapping, cached / online / no KD), ``teacher`` (teachers with the same loop),
``evaluate`` / ``report`` / ``demo`` (``cit eval``, ``cit report``, ``cit demo``), ``cli`` (thin commands).

Library entry points: ``trainer.train.load_run_config(path, overrides)`` then ``trainer.train.train(cfg, out_dir,
resume=False)``; ``trainer.teacher.train_teacher(TeacherSpec(...), cfg)``;
``trainer.evaluate.evaluate_checkpoint(path, manifests)``; ``trainer.report.report(run_dirs)``.
"""
