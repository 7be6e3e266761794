// The move kernel for given directions, widest param 16-bit, unstaged.
#include "move_launch.cuh"

ADAPEFT_INSTANTIATE_MOVE(false, 16, false)
