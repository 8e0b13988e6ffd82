"""Every flag of `python -m aepo_jax.train`, in one place. Defaults are the paper's (AEPO_SPEC.md) unless
noted; `configs/*.flags` set the rest per machine. `--dry_run` prints the resolved values and the mesh.
"""

from absl import flags

# --- run ---------------------------------------------------------------------------------------------
MODE = flags.DEFINE_enum("mode", "rl", ["sft", "rl", "sft_then_rl"],
                         "sft: cold-start supervised fine-tuning; rl: RL from the model; sft_then_rl: both "
                         "in one run (the demo)")
WORKDIR = flags.DEFINE_string("workdir", "workdir", "Checkpoints, metrics and dumps; a run resumes from here")
SEED = flags.DEFINE_integer("seed", 0, "Seed of parameters (random init), data order, sampling")
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the resolved configuration and the mesh, then exit")
LOG_EVERY = flags.DEFINE_integer("log_every", 1, "Steps between metric writes / progress lines")
CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 10, "Steps between checkpoints")
KEEP_CHECKPOINTS = flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept (the newest)")
EXPORT_HF_DIR = flags.DEFINE_string("export_hf_dir", None, "Write the final model here in HF format")
COMPILATION_CACHE_DIR = flags.DEFINE_string("compilation_cache_dir", None,
                                             "JAX's persistent compilation cache: every compiled program is stored "
                                             "here, and a resumed or repeated run with the same shapes loads it "
                                             "instead of compiling. Default: JAX's own setting "
                                             "(JAX_COMPILATION_CACHE_DIR) if set, else <workdir>/compilation_cache; "
                                             "'' turns it off")
MAX_NONFINITE_STEPS = flags.DEFINE_integer("max_nonfinite_steps", 10,
                                           "Abort after this many skipped (non-finite) updates")

# --- model -------------------------------------------------------------------------------------------
MODEL_PATH = flags.DEFINE_string("model_path", None, "Local HF Qwen3 directory (else a random preset)")
MODEL_PRESET = flags.DEFINE_string("model_preset", None, "Preset for a random init (qwen3.PRESETS, 'demo')")
TOKENIZER_PATH = flags.DEFINE_string("tokenizer_path", None,
                                     "Tokenizer directory (HF) or .model file (sentencepiece); default: "
                                     "the model directory")
COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "bfloat16", ["bfloat16", "float32"], "Activations")
PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["bfloat16", "float32"],
                                "Stored (master) weights; the optimiser state follows")
REMAT = flags.DEFINE_bool("remat", False, "Recompute layer activations in the backward pass")
ATTENTION = flags.DEFINE_enum("attention", "auto", ["auto", "xla", "cudnn"],
                              "Training / scoring attention: cudnn (fused flash attention, GPU with bf16 compute), "
                              "xla (any device), auto = cudnn where it applies, else xla")

# --- distribution ------------------------------------------------------------------------------------
MESH_DATA = flags.DEFINE_integer("mesh_data", 1, "Data-parallel axis size")
MESH_FSDP = flags.DEFINE_integer("mesh_fsdp", -1, "FSDP axis size (-1: all remaining devices)")
MESH_TP = flags.DEFINE_integer("mesh_tp", 1, "Tensor-parallel axis size")
DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                "Call jax.distributed.initialize() (multi-host TPU pod slice or GPU cluster)")
COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None,
                                          "host:port of process 0 (not needed on TPU / SLURM)")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (not needed on TPU / SLURM)")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (not needed on TPU / SLURM)")

# --- data --------------------------------------------------------------------------------------------
DEMO_WORLD = flags.DEFINE_bool("demo_world", False,
                               "Generate the built-in synthetic world (corpus, QA splits, SFT traces, "
                               "tokenizer) into <workdir>/world and use it for every data flag left empty")
TRAIN_FILE = flags.DEFINE_string("train_file", None, "RL questions, JSONL {question, answers}")
EVAL_FILE = flags.DEFINE_string("eval_file", None, "Held-out questions, JSONL {question, answers}")
SFT_FILE = flags.DEFINE_string("sft_file", None, "SFT traces, JSONL {question, response} (the prompt "
                                  "built as for RL, --prompt_format) or {prompt, response} (used as written)")
CORPUS_FILE = flags.DEFINE_string("corpus_file", None, "Search corpus, JSONL {id, title, text}")

# --- SFT ---------------------------------------------------------------------------------------------
SFT_STEPS = flags.DEFINE_integer("sft_steps", 100, "Optimiser steps of SFT")
SFT_BATCH_SIZE = flags.DEFINE_integer("sft_batch_size", 16, "Sequences per SFT step")
SFT_LEARNING_RATE = flags.DEFINE_float("sft_learning_rate", 1e-5,
                                       "Learning rate of SFT (constant after --warmup_steps)")
MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 1024, "Longest SFT sequence (prompt + response)")

# --- RL: rollout -------------------------------------------------------------------------------------
RL_STEPS = flags.DEFINE_integer("rl_steps", 100, "RL steps (rollout + updates)")
ROLLOUT = flags.DEFINE_enum("rollout", "aepo", ["grpo", "arpo", "aepo"], "Rollout scheduler")
QUESTIONS_PER_STEP = flags.DEFINE_integer("questions_per_step", 64, "Questions per RL step")
GROUP_SIZE = flags.DEFINE_integer("group_size", 12, "k: trajectories per question")
INITIAL_ROLLOUTS = flags.DEFINE_integer("initial_rollouts", 6,
                                        "m: global samples when entropy pre-monitoring is off")
PRE_MONITOR = flags.DEFINE_bool("pre_monitor", True, "AEPO entropy pre-monitoring decides m")
REUSE_PROBE = flags.DEFINE_bool("reuse_probe", True, "Keep the pre-monitoring trajectory as a sample")
BUDGET_BETA = flags.DEFINE_float("budget_beta", 0.5, "beta of m = clip(floor(k sigmoid(beta dH)) + 1, 1, k)")
BRANCH_GAMMA = flags.DEFINE_float("branch_gamma", 0.2, "gamma: weight of the entropy change in P(branch)")
BRANCH_TAU = flags.DEFINE_float("branch_tau", 0.5, "tau: branch iff p >= tau")
BRANCH_LAMBDA = flags.DEFINE_float("branch_lambda", 0.05, "lambda: consecutive-branch penalty (AEPO)")
BRANCH_PENALTY_SCOPE = flags.DEFINE_enum("branch_penalty_scope", "question", ["question", "path"],
                                         "Count consecutive branching rounds per question (released "
                                         "code) or per path (paper)")
ENTROPY_WINDOW = flags.DEFINE_integer("entropy_window", 20, "w: tokens of a segment's entropy signal")
ENTROPY_REDUCTION = flags.DEFINE_enum("entropy_reduction", "mean", ["mean", "sum"],
                                      "Segment entropy over the window (sum = released code's scale)")
MAX_TOOL_CALLS = flags.DEFINE_integer("max_tool_calls", 6, "Tool calls per trajectory")
MAX_RESPONSE_TOKENS = flags.DEFINE_integer("max_response_tokens", 4096,
                                           "Response budget (model AND tool tokens)")
MAX_PROMPT_TOKENS = flags.DEFINE_integer("max_prompt_tokens", 1024, "Longest prompt")
ROLLOUT_SLOTS = flags.DEFINE_integer("rollout_slots", 0, "Engine slots (0: questions_per_step * group_size)")
TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature in training")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling in training")
DECODE_CHUNK = flags.DEFINE_integer("decode_chunk", 64, "Max decode steps per engine call")
WAIT_FRACTION = flags.DEFINE_float("wait_fraction", 0.0625,
                                   "Return to the host when this fraction of the running slots has stopped "
                                   "(tool tag, EOS or length)")
TOOL_OVERLAP = flags.DEFINE_bool("tool_overlap", True,
                                 "Queue the next decode call before reading the last one, so result handling and "
                                 "tools run while the device decodes (tool results join one call later); off: "
                                 "read the results, wait for the tools, then decode")
OVERLAP_MIN_RUNNING = flags.DEFINE_integer("overlap_min_running", 8,
                                          "With --tool_overlap, queue ahead only while at least this many slots "
                                          "run; with fewer, each tool result joins the very next call")
DEFER_APPENDS = flags.DEFINE_bool("defer_appends", True,
                                  "Give each decode call its tool results in whole lane steps (a multiple of "
                                  "--lane_rows, whose cost hardly depends on how many rows they fill); the few "
                                  "left over join the next call first")
LANE_ROWS = flags.DEFINE_integer("lane_rows", 4,
                                 "Tool results are appended inside the next decode call, the next lane_width "
                                 "tokens of up to this many slots per step (0: a prefill call per round)")
LANE_WIDTH = flags.DEFINE_integer("lane_width", 64, "Appended tokens per lane row and decode step")

PROMPT_FORMAT = flags.DEFINE_enum("prompt_format", "auto", ["auto", "chat", "plain"],
                                  "RL and eval prompts: chat renders the system + user messages with the "
                                  "tokenizer's chat template (e.g. Qwen3's), plain the demo's text prompt; auto: "
                                  "chat when the tokenizer has a template")

# --- RL: loss and optimiser ----------------------------------------------------------------------------
POLICY_LOSS = flags.DEFINE_string("policy_loss", "aepo", "Entry of aepo_jax.core.losses.POLICY_LOSSES")
ADVANTAGE = flags.DEFINE_enum("advantage", "grpo", ["grpo", "grpo_no_std", "dr_grpo", "rloo"],
                              "Sequence advantage estimator")
HARD_ATTRIBUTION = flags.DEFINE_bool("hard_attribution", False,
                                     "ARPO hard attribution: shared prefix tokens get the mean advantage "
                                     "of the branches containing them")
ENTROPY_ADVANTAGE_ALPHA = flags.DEFINE_float("entropy_advantage_alpha", 0.2,
                                             "AEPO entropy-aware advantage a (0: off)")
OVERLONG_BUFFER = flags.DEFINE_integer("overlong_buffer", 0,
                                       "DAPO soft overlong punishment: a response of L tokens (tool results "
                                       "included) gets min(0, (max_response_tokens - buffer - L) / buffer) added "
                                       "to its reward, -1 past max_response_tokens (0: off; DAPO: 4096 of 20480)")
DYNAMIC_SAMPLING = flags.DEFINE_bool("dynamic_sampling", False,
                                     "DAPO dynamic sampling: groups whose rewards are all equal (zero advantage) "
                                     "are left out of the loss, so they do not dilute the token mean; the "
                                     "batch keeps its shape, and a step with no group left makes no update")
DYNAMIC_SAMPLING_ROUNDS = flags.DEFINE_integer("dynamic_sampling_rounds", 1,
                                               "With --dynamic_sampling: rollouts per RL step at most. Above 1, "
                                               "fresh questions are rolled out (DAPO's over-sampling) until "
                                               "questions_per_step groups have unequal rewards; flat groups "
                                               "fill what is still missing and are left out of the loss")
CLIP_EPS_LOW = flags.DEFINE_float("clip_eps_low", None, "Override the loss's lower clip")
CLIP_EPS_HIGH = flags.DEFINE_float("clip_eps_high", None, "Override the loss's upper clip")
KL_COEF = flags.DEFINE_float("kl_coef", 0.0, "KL penalty to the initial (reference) model; 0: no reference")
KL_ESTIMATOR = flags.DEFINE_enum("kl_estimator", "k3", ["k1", "k2", "k3"], "KL estimator")
ENTROPY_COEF = flags.DEFINE_float("entropy_coef", 0.0, "Entropy bonus")
OLD_LOGPROBS = flags.DEFINE_enum("old_logprobs", "sampler", ["sampler", "recompute"],
                                 "pi_old from the sampler's records or a trainer forward before updating")
LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-6, "RL AdamW learning rate (constant after --warmup_steps)")
WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay")
GRAD_CLIP = flags.DEFINE_float("grad_clip", 1.0, "Global gradient-norm clip (0: off)")
WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 0, "Linear warm-up steps")
MINI_BATCHES = flags.DEFINE_integer("mini_batches", 8, "Optimiser steps per rollout batch")
MICRO_BATCHES = flags.DEFINE_integer("micro_batches", 1, "Gradient-accumulation splits of a mini-batch")
REWARD_FN = flags.DEFINE_string("reward_fn", "f1_format", "Entry of aepo_jax.data.rewards.REWARD_FUNCTIONS")

# --- tools --------------------------------------------------------------------------------------------
SEARCH_TOP_K = flags.DEFINE_integer("search_top_k", 3, "Passages per search result")
SEARCH_URL = flags.DEFINE_string("search_url", None, "HTTP search service (instead of the local corpus)")
PYTHON_TIMEOUT = flags.DEFINE_float("python_timeout", 5.0, "Seconds per python tool call")
TOOL_THREADS = flags.DEFINE_integer("tool_threads", 16, "Concurrent tool calls")

# --- evaluation and dumps ---------------------------------------------------------------------------------
EVAL_EVERY = flags.DEFINE_integer("eval_every", 10, "RL steps between held-out evaluations (there is always "
                                  "one at the start and one at the end of RL; 0: only those)")
EVAL_QUESTIONS = flags.DEFINE_integer("eval_questions", 64, "Held-out questions per evaluation")
EVAL_K = flags.DEFINE_integer("eval_k", 4, "Samples per question for pass@k")
EVAL_TEMPERATURE = flags.DEFINE_float("eval_temperature", 0.6, "Sampling temperature for pass@k")
DUMP_EVERY = flags.DEFINE_integer("dump_every", 10, "RL steps between trajectory dumps (JSONL)")


def resolved() -> dict[str, object]:
    """{flag name: value} of every flag defined in this module."""
    return {name: flags.FLAGS[name].value for name in sorted(_NAMES)}


_NAMES = [f.name for f in flags.FLAGS.get_flags_for_module(__name__)]
