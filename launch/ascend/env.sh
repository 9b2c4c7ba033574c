# Ascend NPU environment for LocMoE jobs (Megatron-LM or DeepSpeed). Source it on every node:
#   source launch/ascend/env.sh
# Every value below can be set before sourcing; the defaults are only filled in where unset.

# CANN toolkit (driver, runtime, HCCL) and, if installed, the NNAL/ATB libraries.
ASCEND_HOME=${ASCEND_HOME:-/usr/local/Ascend}
if [ -f "$ASCEND_HOME/ascend-toolkit/set_env.sh" ]; then
  source "$ASCEND_HOME/ascend-toolkit/set_env.sh"
else
  echo "env.sh: no $ASCEND_HOME/ascend-toolkit/set_env.sh (set ASCEND_HOME to the CANN install)" >&2
fi
[ ! -f "$ASCEND_HOME/nnal/atb/set_env.sh" ] || source "$ASCEND_HOME/nnal/atb/set_env.sh"

# locmoe_plugin.device: use the NPU (torch_npu + HCCL) instead of auto-detection.
export LOCMOE_DEVICE=${LOCMOE_DEVICE:-npu}
# NPUs this process may use (the NPU counterpart of CUDA_VISIBLE_DEVICES).
export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7}

# HCCL: seconds to wait for all ranks to connect / for one collective; buffer per communicator (MB).
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1200}
export HCCL_BUFFSIZE=${HCCL_BUFFSIZE:-200}
# Multi-node: the host NIC HCCL uses to set up its communicators. Give its IP (HCCL_IF_IP, per node)
# or its name (HCCL_SOCKET_IFNAME, e.g. eth0); left unset here because it differs per machine.
# export HCCL_IF_IP=10.0.0.1
# export HCCL_SOCKET_IFNAME=eth0

# torch_npu: asynchronous operator dispatch, and a caching allocator that fragments less.
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
# Megatron-LM's sequence parallelism asserts this (it orders the communication streams).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
