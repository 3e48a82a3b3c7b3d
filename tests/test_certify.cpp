// Certificates from logits: the margin rule, the lln pairwise rule (with a binding class that is not the
// runner-up), the strict r > eps test, ties, NaN / inf logits, and the report's aggregates.
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "orthoconv/certify.hpp"

using namespace orthoconv;

TEST_CASE("margin certificate: r = (f_c - max_{j != c} f_j) / (sqrt(2) L)", "[certify]") {
  const float logits[4] = {0.5f, 2.0f, 1.25f, -3.0f};
  const double L = 1.0 / 0.2507;
  ImageCertificate c = certify_margin(logits, 4, 1, L);
  CHECK(c.predicted == 1);
  CHECK(c.correct);
  CHECK(c.radius == Approx(0.75 / (std::sqrt(2.0) * L)).epsilon(1e-12));
  ImageCertificate wrong = certify_margin(logits, 4, 2, L);
  CHECK_FALSE(wrong.correct);
  CHECK_FALSE(certified_at(wrong, 0));  // a misclassified image is never certified, whatever its margin
}

TEST_CASE("certified at eps iff correct and r > eps, strictly", "[certify]") {
  ImageCertificate c;
  c.predicted = 0;
  c.correct = true;
  c.radius = 36.0 / 255.0;
  CHECK_FALSE(certified_at(c, 36));  // equal is not enough
  c.radius = std::nextafter(36.0 / 255.0, 1.0);
  CHECK(certified_at(c, 36));
  CHECK_FALSE(certified_at(c, 72));
  c.correct = false;
  CHECK_FALSE(certified_at(c, 36));
}

TEST_CASE("tied top logits: the first arg-max is predicted and the radius is 0, never certified", "[certify]") {
  const float logits[3] = {1.0f, 4.0f, 4.0f};
  ImageCertificate c = certify_margin(logits, 3, 1, 1.0);
  CHECK(c.predicted == 1);
  CHECK(c.correct);
  CHECK(c.radius == 0.0);
  CHECK_FALSE(certified_at(c, 0));  // r > 0 fails for r == 0
}

TEST_CASE("NaN or infinite logits are never correct nor certified", "[certify]") {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const float with_nan[3] = {5.0f, nan, 0.0f};
  const float with_inf[3] = {inf, 0.0f, 0.0f};
  for (const float* logits : {with_nan, with_inf}) {
    ImageCertificate c = certify_margin(logits, 3, 0, 1.0);
    CHECK(c.predicted == -1);
    CHECK_FALSE(c.correct);
    CHECK(std::isnan(c.radius));
    CHECK_FALSE(certified_at(c, 0));
  }
  std::vector<double> rows{1, 0, 0, 1, -1, 0};
  ImageCertificate l = certify_lln(with_nan, 3, 0, lln_pair_norms(rows, 3, 2), 1.0);
  CHECK_FALSE(l.correct);
  CHECK_FALSE(certified_at(l, 0));
  CertifyReport report;
  report.certified[0] = 0;
  report.add(l);
  CHECK(report.images == 1);
  CHECK(report.correct == 0);
  CHECK(report.certified[0] == 0);
}

TEST_CASE("lln certificate takes the minimum over all classes, not the runner-up", "[certify]") {
  // q0 = (1, 0), q1 = (0.8, 0.6) close to q0, q2 = (-1, 0) far from q0.
  // f = (3, 2.2, 1): the runner-up is class 1 (margin 0.8, ||q0 - q1|| = sqrt(0.4)): 0.8 / 0.632 = 1.265;
  // class 2 has margin 2 but ||q0 - q2|| = 2: 2 / 2 = 1.0 binds. The margin rule would give 0.8 / sqrt(2).
  std::vector<double> rows{1.0, 0.0, 0.8, 0.6, -1.0, 0.0};
  auto norms = lln_pair_norms(rows, 3, 2);
  CHECK(norms[0 * 3 + 1] == Approx(std::sqrt(0.4)).epsilon(1e-12));
  CHECK(norms[0 * 3 + 2] == Approx(2.0).epsilon(1e-12));
  CHECK(norms[2 * 3 + 0] == norms[0 * 3 + 2]);
  const float logits[3] = {3.0f, 2.2f, 1.0f};
  const double L = 2.0;
  ImageCertificate c = certify_lln(logits, 3, 0, norms, L);
  CHECK(c.predicted == 0);
  CHECK(c.radius == Approx(2.0 / (2.0 * L)).epsilon(1e-12));
  const double runner_up_rule = (static_cast<double>(3.0f) - static_cast<double>(2.2f)) / (std::sqrt(0.4) * L);
  CHECK(c.radius < runner_up_rule);
}

TEST_CASE("Certifier aggregates clean and certified accuracy and the mean radius of correct images", "[certify]") {
  Certifier certifier({0, 36}, 1.0 / std::sqrt(2.0));  // sqrt(2) * L = 1 (up to rounding): r = margin
  // image 0: correct, margin 1.0; image 1: correct, margin 0.1; image 2: wrong; image 3: NaN.
  const float logits[4 * 3] = {
      2.0f, 1.0f, 0.0f, 0.1f, 0.0f, 0.0f, 0.0f, 5.0f, 0.0f, std::numeric_limits<float>::quiet_NaN(), 0.0f, 0.0f};
  const int32_t labels[4] = {0, 0, 0, 0};
  certifier.add_batch(logits, 4, 3, labels);
  const CertifyReport& r = certifier.report();
  CHECK(r.images == 4);
  CHECK(r.correct == 2);
  CHECK(r.clean_accuracy() == Approx(0.5));
  CHECK(r.certified.at(0) == 2);
  CHECK(r.certified.at(36) == 1);  // 0.1 < 36/255 = 0.141
  CHECK(r.certified_accuracy(36) == Approx(0.25));
  CHECK(r.mean_radius() == Approx((1.0 + static_cast<double>(0.1f)) / 2).epsilon(1e-9));
}

TEST_CASE("unequal channel stds: the certificate takes 1/min(std), as 1/max(std) would certify a point that flips",
          "[certify]") {
  // A 1-Lipschitz classifier of the normalized input z = (x - mean) / std that reads one red pixel:
  //   logits (w z_p, -w z_p) with w = 1/sqrt(2) (Lipschitz w * ||(1, -1)|| = 1), margin 2 w z_p.
  // In pixel space the decision boundary is x_p = mean_red, at distance |x_p - mean_red|, and the certificate
  // margin / (sqrt(2) L_in) equals that distance exactly when L_in = 1 / std_red = 1 / min(std).
  Normalization norm;
  norm.mean = {0.5f, 0.5f, 0.5f};
  norm.std = {0.2f, 0.5f, 0.4f};  // red has the smallest std
  const NormalizationTable table = normalization_table(norm);
  const uint8_t byte = 179;  // x_p = 179/255 = 0.70196
  const double w = 1.0 / std::sqrt(2.0);
  auto logits_at = [&](double z) { return std::array<double, 2>{w * z, -w * z}; };
  const auto f = logits_at(table[0][byte]);
  const ImageCertificate c = certify_margin(f.data(), 2, 0, norm.lipschitz());
  const double distance = byte / 255.0 - 0.5;  // to the boundary, moving the red pixel only
  REQUIRE(c.correct);
  INFO("certified radius " << c.radius << ", distance to a flipped image " << distance);
  CHECK(c.radius <= distance * (1 + 1e-6));  // float32 z_p: relative rounding 1e-7
  CHECK(c.radius >= distance * (1 - 1e-6));  // and the certificate is tight here
  // Just beyond the boundary the class flips, ...
  const double beyond = distance + 1e-3;
  const auto flipped = logits_at((byte / 255.0 - beyond - 0.5) / static_cast<double>(norm.std[0]));
  CHECK(flipped[1] > flipped[0]);
  CHECK_FALSE(c.radius > beyond);
  // ... which the wrong constant 1/max(std) would have certified: this test tells the two apart.
  const double wrong_lipschitz = 1.0 / static_cast<double>(std::max({norm.std[0], norm.std[1], norm.std[2]}));
  CHECK(certify_margin(f.data(), 2, 0, wrong_lipschitz).radius > beyond);
}
