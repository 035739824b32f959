# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if header :is "x-spam-score" ["1", "7"] {
  fileinto "yes";
} else {
  fileinto "no";
}
