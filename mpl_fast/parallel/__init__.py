"""How the networks are spread over devices and processes: data parallel (gradient averaging),
FSDP sharding, model parallel (the link between the teacher's and the student's halves), and
torchrun's process groups."""
