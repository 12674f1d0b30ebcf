"""The tensor side of a step: the model runner, the step's input rows, the three batch kinds, pixel decoding, the
static step.
"""
