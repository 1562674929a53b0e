"""Training: the loops of both kinds, and the one shell that runs either on Ray Train.

Shell (both kinds; the kind is a ``kind.Kind`` from ``ray_pinet/kinds``):
- ``trainer``: the driver, ``fit(cfg)``: data -> ``TorchTrainer.fit`` -> summary -> MLflow run
- ``worker``: ``train_func``, what each Ray Train worker runs: checkpoint, device, logger -> ``Kind.loop``
- ``checkpoint``: ``state.pt``, the one checkpoint format (load, report with a checkpoint)
- ``kind``: ``Kind``, ``LoopContext``, ``FitResult``: what the shell knows of a kind
- ``resume``: a relaunch resumes only with the config it was started with

Sequence kind (PINet and its baselines): ``run_inputs`` (the prepared folder, checked on the driver),
``engine`` (stage 1, the whole run), ``stage2`` (the plugins), ``loop`` (one epoch), ``ga_step``
(the GA all-reduce), ``batches`` / ``shards`` / ``packing`` (each rank's rows and global batches),
``sparse_rows``, ``transfer_epoch``, ``per_stratum`` (separate / finetune as K runs), ``sequence_outputs``
(what a finished run logs). Two-tower kind: ``twotower_loop``, ``inverse_gradient``. Both: ``early_stopping``
(every stage and loop), ``collectives`` (torch.distributed, a no-op in one process), ``device``, ``exactness``
(``ray-pinet check``: W workers equal one process).

Ray is imported by ``trainer`` and ``worker``, lazily by ``checkpoint.report`` (Ray Train's report),
``device`` ("auto": the GPU Ray Train reserved) and ``exactness`` (its own workers); everything else here runs
without Ray (the GPU check, the in-process tests).
"""
