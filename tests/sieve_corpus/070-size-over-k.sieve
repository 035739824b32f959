# envelope: from=alice@example.org to=bob+lists@example.com message=messages/large.eml
require ["fileinto"];
if size :over 10K {
  fileinto "yes";
} else {
  fileinto "no";
}
