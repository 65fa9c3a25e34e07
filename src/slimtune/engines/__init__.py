"""How a job runs over processes: the support table (``support``), and one :class:`~slimtune.engines.base.Engine`
each for a single process or DDP (accelerate), FSDP2 (``fsdp``) and DeepSpeed ZeRO (``deepspeed``)."""
