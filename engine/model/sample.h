/* The next token from a model's logits: greedy (argmax, the lowest id on ties) when temperature is 0 or
 * top_k is 1; otherwise the logits divided by the temperature, kept to the top_k largest (top_k > 1), then
 * to the nucleus of top_p (0 < top_p < 1: the most probable tokens whose probabilities reach top_p, at
 * least one; Megatron takes top_k or top_p, Hugging Face both in this order), softmax over what is kept, and
 * the token whose cumulative probability (in descending order) first exceeds u in [0, 1). Only ids
 * below V take part (a padded vocabulary's extra rows never do). Returns the id, or -1 for V < 1. */
#ifndef LT_MODEL_SAMPLE_H
#define LT_MODEL_SAMPLE_H

int lt_sample_token(const float *logits, int V, float temperature, int top_k, float top_p, float u);

#endif
