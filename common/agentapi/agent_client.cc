#include "common/agentapi/agent_client.h"

namespace peapod::agentapi {

AgentClient AgentClient::Over(std::shared_ptr<ttrpc::Client> client) {
  return AgentClient([client = std::move(client)](const char* method, std::string payload,
                                                  Timeout timeout, Resend,
                                                  ttrpc::Client::Callback done) {
    ttrpc::CallOptions o;
    o.timeout = timeout;
    client->Call(kService, method, std::move(payload), o, std::move(done));
  });
}

}  // namespace peapod::agentapi
