"""Distillation of a rectified-flow teacher into a few-step student (SD3.5-Flash).

- :mod:`.config`: ``DistillConfig`` and presets;
- :mod:`.prompts`: prompt sources (shapes world, text / JSONL files);
- :mod:`.models`: frozen teacher, trainable student and fake copies, prompt conditioning;
- :mod:`.rollout`: student trajectories on the student schedule;
- :mod:`.trajectory`: stage 0, trajectory guidance (cached teacher trajectories, ``L_TG``);
- :mod:`.dmd`: distribution matching with timestep sharing (``L_dm``);
- :mod:`.fake`: the fake model's flow-matching objective;
- :mod:`.adversarial`: feature hooks, discriminator heads, hinge losses, head re-init;
- :mod:`.critic`: fake model + heads as one module;
- :mod:`.real`: the GAN's real side;
- :mod:`.randomness`: per-step draws independent of the process count;
- :mod:`.method`: ``FlowDMD``, the method object (models, optimisers, the losses of each stage);
- :mod:`.trainer`: the run on the generic loop (hooks, checkpoints); :mod:`.export`: the student folder;
  :mod:`.run`: the command.
"""
