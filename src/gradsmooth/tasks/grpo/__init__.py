"""GRPO post-training for reasoning with verifiable answers, on TRL's ``GRPOTrainer``.

``python train.py task=grpo`` warm-starts a 6-block Llama on worked solutions of generated
arithmetic problems (``warm_start``), then post-trains it with GRPO and reports ``val/acc``, the
greedy accuracy on a fixed held-out set (``runner``). ``data=gsm8k policy.path=<model>`` runs a
pretrained causal LM on GSM8K; ``+experiment=grpo_qwen_gsm8k`` is the paper-scale configuration.

Deviations from the paper (Meng, Sugolov and Papyan, arXiv 2606.30813) and from GRPO as
published (Shao et al., DeepSeekMath):

1. The default policy is a 1.3M-parameter Llama warm-started for 300 steps on generated
   arithmetic, not a Qwen2.5 model on GSM8K, so accuracies are not comparable to the paper's.
2. Half of the warm-start solutions stop after the first step and answer with its result, so
   the warm-started policy sometimes answers too early; much of the accuracy GRPO adds on CPU
   comes from learning to finish the steps.
3. The loss is TRL's ``dapo`` token-level aggregation by default (``task.loss_type=grpo`` gives
   the per-sequence normalisation of the original GRPO), with one optimisation pass per
   generation batch, so the importance ratio is 1 and clipping is inactive unless
   ``task.num_iterations`` > 1.
4. The KL penalty is off by default (``task.beta=0``) on CPU to save the reference model's
   forward pass; the paper-scale experiment sets ``task.beta=0.001``.
5. Evaluation is greedy single-sample accuracy, not pass@k or majority voting.
6. Runs cannot be resumed (``trainer.resume`` is rejected), and only one process is supported.
"""
