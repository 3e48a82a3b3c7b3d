// Epoch metrics: one JSON line each (the history in checkpoints, metrics.jsonl) and the CSV columns.
// See include/orthoconv/trainer.hpp.
#include "train/metrics_files.hpp"

#include <charconv>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "orthoconv/checkpoint.hpp"
#include "orthoconv/limits.hpp"
#include "train/json_fields.hpp"

namespace orthoconv {

std::string EpochMetrics::json() const {
  nlohmann::ordered_json j;
  j["epoch"] = epoch;
  j["step"] = step;
  j["precision"] = precision;
  j["lr"] = lr;
  j["seconds"] = seconds;
  j["images_per_second"] = images_per_second;
  j["train_loss"] = train_loss;
  j["train_accuracy"] = train_accuracy;
  j["evaluated"] = evaluated;
  if (evaluated) {
    j["test_loss"] = test_loss;
    j["test_accuracy"] = test_accuracy;
    nlohmann::ordered_json cert;
    for (auto& [eps, acc] : certified) cert[std::to_string(eps)] = acc;
    j["certified_accuracy"] = cert;
    j["mean_radius"] = mean_radius;
    j["test_images"] = test_images;
  }
  if (validated) {
    j["val_accuracy"] = val_accuracy;
    j["val_certified_accuracy"] = val_certified;
  }
  if (ranks > 1) {  // a single process's lines stay as they were
    j["ranks"] = ranks;
    j["allreduce_seconds"] = allreduce_seconds;
  }
  return j.dump();
}

EpochMetrics EpochMetrics::from_json(const std::string& line) {
  EpochMetrics m;
  try {
    const nlohmann::json j = nlohmann::json::parse(line);
    m.epoch = json_int(j, "epoch", 1, kMaxTrainingSteps);
    m.step = json_int(j, "step", 0, kMaxTrainingSteps);
    m.precision = json_string(j, "precision", "fp32");
    m.lr = json_number(j, "lr");
    m.seconds = json_number(j, "seconds");
    m.images_per_second = json_number(j, "images_per_second");
    m.train_loss = json_number(j, "train_loss");
    m.train_accuracy = json_number(j, "train_accuracy");
    m.evaluated = j.at("evaluated").get<bool>();
    if (m.evaluated) {
      m.test_loss = json_number(j, "test_loss");
      m.test_accuracy = json_number(j, "test_accuracy");
      const nlohmann::json& certified = j.at("certified_accuracy");
      require(certified.is_object(), "'certified_accuracy' must be an object");
      for (const auto& item : certified.items()) {
        const std::string& key = item.key();
        int eps = -1;
        const auto [end, error] = std::from_chars(key.data(), key.data() + key.size(), eps);
        require(error == std::errc() && end == key.data() + key.size() && eps >= 0,
                "'certified_accuracy' keys must be eps numerators, got '", key, "'");
        m.certified[eps] = json_number(certified, key);
      }
      m.mean_radius = json_number(j, "mean_radius");
      m.test_images = json_int(j, "test_images", 0, kLargestInt64);
    }
    if (j.contains("val_accuracy")) {
      m.validated = true;
      m.val_accuracy = json_number(j, "val_accuracy");
      m.val_certified = json_number(j, "val_certified_accuracy");
    }
    if (j.contains("ranks")) {
      m.ranks = static_cast<int>(json_int(j, "ranks", 1, kLargestInt));
      m.allreduce_seconds = json_number(j, "allreduce_seconds");
    }
  } catch (const Error& e) {
    throw ConfigError(std::string("invalid epoch metrics: ") + e.what());
  } catch (const std::exception& e) {
    throw ConfigError(std::string("invalid epoch metrics JSON: ") + e.what());
  }
  return m;
}

void write_metrics_files(const std::string& out_dir, const std::vector<EpochMetrics>& history,
                         const std::vector<int>& eps) {
  std::string jsonl, csv =
                         "epoch,step,precision,lr,seconds,images_per_second,train_loss,train_accuracy,test_loss,"
                         "test_accuracy";
  for (int e : eps) csv += ",certified_" + std::to_string(e);
  csv += ",mean_radius,test_images,val_accuracy,val_certified_accuracy\n";
  for (const EpochMetrics& m : history) {
    jsonl += m.json() + "\n";
    std::ostringstream row;
    row.precision(10);
    row << m.epoch << "," << m.step << "," << m.precision << "," << m.lr << "," << m.seconds << ","
        << m.images_per_second << "," << m.train_loss << "," << m.train_accuracy << ",";
    if (m.evaluated) {
      row << m.test_loss << "," << m.test_accuracy;
      for (int e : eps) {
        auto it = m.certified.find(e);
        row << ",";
        if (it != m.certified.end()) row << it->second;
      }
      row << "," << m.mean_radius << "," << m.test_images;
    } else {
      row << ",";
      for (size_t i = 0; i < eps.size(); ++i) row << ",";
      row << ",,";
    }
    row << ",";
    if (m.validated)
      row << m.val_accuracy << "," << m.val_certified;
    else
      row << ",";
    csv += row.str() + "\n";
  }
  write_file_atomically((std::filesystem::path(out_dir) / "metrics.jsonl").string(), jsonl);
  write_file_atomically((std::filesystem::path(out_dir) / "metrics.csv").string(), csv);
}

}  // namespace orthoconv
