// Tiny driver around real Caffe's upgrade_proto (linked from the oracle's _caffe.so) that
// makes the golden files for tests/test_upgrade.py.  Not part of the package; see
// tests/data/upgrade/oracle/make_golden.py, which builds and runs it.
//
//   upgrade_driver net-text IN OUT        prototxt  -> UpgradeNetAsNeeded -> prototxt
//   upgrade_driver net-binary IN OUT      binary    -> UpgradeNetAsNeeded -> binary
//   upgrade_driver solver-text IN OUT     solver    -> UpgradeSolverAsNeeded -> text
//   upgrade_driver solver-netparam IN OUT solver's inline net_param -> UpgradeNetAsNeeded -> text
// stdout: "applied: <steps>" (which Needs* predicates held when each step was reached) and
// "success: 0|1".  A Caffe CHECK / LOG(FATAL) aborts the process (non-zero exit, message on stderr).
#include <cstring>
#include <iostream>
#include <string>

#include <glog/logging.h>
#include "caffe/proto/caffe.pb.h"

namespace caffe {
bool ReadProtoFromTextFile(const char* filename, google::protobuf::Message* proto);
bool ReadProtoFromBinaryFile(const char* filename, google::protobuf::Message* proto);
void WriteProtoToTextFile(const google::protobuf::Message& proto, const char* filename);
void WriteProtoToBinaryFile(const google::protobuf::Message& proto, const char* filename);
bool UpgradeNetAsNeeded(const std::string& param_file, NetParameter* param);
bool UpgradeSolverAsNeeded(const std::string& param_file, SolverParameter* param);
bool NetNeedsV0ToV1Upgrade(const NetParameter& net_param);
bool NetNeedsDataUpgrade(const NetParameter& net_param);
bool NetNeedsV1ToV2Upgrade(const NetParameter& net_param);
bool NetNeedsInputUpgrade(const NetParameter& net_param);
bool NetNeedsBatchNormUpgrade(const NetParameter& net_param);
bool UpgradeV0Net(const NetParameter& v0_net_param, NetParameter* net_param);
void UpgradeNetDataTransformation(NetParameter* net_param);
bool UpgradeV1Net(const NetParameter& v1_net_param, NetParameter* net_param);
void UpgradeNetInput(NetParameter* net_param);
void UpgradeNetBatchNorm(NetParameter* net_param);
}  // namespace caffe

using caffe::NetParameter;

// Walk the same steps as UpgradeNetAsNeeded, recording which ones ran.
static std::string AppliedSteps(NetParameter p) {
  std::string s;
  if (caffe::NetNeedsV0ToV1Upgrade(p)) {
    NetParameter o(p);
    caffe::UpgradeV0Net(o, &p);
    s += " v0_to_v1";
  }
  if (caffe::NetNeedsDataUpgrade(p)) {
    caffe::UpgradeNetDataTransformation(&p);
    s += " data_transform";
  }
  if (caffe::NetNeedsV1ToV2Upgrade(p)) {
    NetParameter o(p);
    caffe::UpgradeV1Net(o, &p);
    s += " v1_to_v2";
  }
  if (caffe::NetNeedsInputUpgrade(p)) {
    caffe::UpgradeNetInput(&p);
    s += " input";
  }
  if (caffe::NetNeedsBatchNormUpgrade(p)) {
    caffe::UpgradeNetBatchNorm(&p);
    s += " batch_norm";
  }
  return s;
}

static int UpgradeNet(NetParameter* p, const char* in) {
  // Quiet while replaying the steps, so each logged error appears once (fatal still aborts).
  const int level = FLAGS_minloglevel;
  FLAGS_minloglevel = 3;
  const std::string applied = AppliedSteps(*p);
  FLAGS_minloglevel = level;
  std::cout << "applied:" << applied << std::endl;
  bool ok = caffe::UpgradeNetAsNeeded(in, p);
  std::cout << "success: " << ok << std::endl;
  return 0;
}

int main(int argc, char** argv) {
  FLAGS_logtostderr = 1;
  google::InitGoogleLogging(argv[0]);
  if (argc != 4) {
    std::cerr << "usage: upgrade_driver MODE IN OUT" << std::endl;
    return 64;
  }
  const std::string mode(argv[1]);
  const char* in = argv[2];
  const char* out = argv[3];
  if (mode == "net-text" || mode == "net-binary") {
    NetParameter p;
    bool read = mode == "net-text" ? caffe::ReadProtoFromTextFile(in, &p)
                                   : caffe::ReadProtoFromBinaryFile(in, &p);
    if (!read) { std::cerr << "parse failed" << std::endl; return 65; }
    UpgradeNet(&p, in);
    if (mode == "net-text") caffe::WriteProtoToTextFile(p, out);
    else caffe::WriteProtoToBinaryFile(p, out);
    return 0;
  }
  if (mode == "solver-text" || mode == "solver-netparam") {
    caffe::SolverParameter s;
    if (!caffe::ReadProtoFromTextFile(in, &s)) {
      std::cerr << "parse failed" << std::endl;
      return 65;
    }
    if (mode == "solver-text") {
      bool ok = caffe::UpgradeSolverAsNeeded(in, &s);
      std::cout << "success: " << ok << std::endl;
      caffe::WriteProtoToTextFile(s, out);
    } else {
      NetParameter p(s.net_param());
      UpgradeNet(&p, in);
      caffe::WriteProtoToTextFile(p, out);
    }
    return 0;
  }
  std::cerr << "unknown mode " << mode << std::endl;
  return 64;
}
