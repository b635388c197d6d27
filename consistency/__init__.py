"""fixative.consistency — latent consistency distillation of a core teacher (LCD, LCM-LoRA) on core's training
loop: ``lcd`` (the per-step computation), ``objective`` (the ``fine_tune`` objective), ``export`` (the student
folder), ``toy`` (the toy world's shipped LCM-LoRA), ``cli`` (``fixative distill``)."""
